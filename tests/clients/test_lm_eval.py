"""lm-evaluation-harness' `local-completions` model against the real instruct model: a tiny
local multiple-choice task (loglikelihood: echo, logprobs, max_tokens 0 or 1, token-id prompts)
and a generate_until task, both with batch_size 4 (several prompts and stop strings in one
completion request)."""

from __future__ import annotations

import json

import pytest

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("England", "London"), ("Russia", "Moscow"),
            ("Egypt", "Cairo")]


def _write_tasks(root) -> None:
    names = [capital for _, capital in CAPITALS]
    with open(root / "capitals.jsonl", "w") as f:
        for i, (country, capital) in enumerate(CAPITALS):
            choices = [capital] + [c for c in names if c != capital][:3]
            choices = choices[i % 4:] + choices[:i % 4]  # the answer is not always first
            f.write(json.dumps({"country": country, "capital": capital, "choices": choices,
                                "label": choices.index(capital)}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {root / 'capitals.jsonl'}\ntest_split: test\n"
              "doc_to_text: \"The capital of {{country}} is\"\n")
    (root / "capitals_mc.yaml").write_text(
        "task: capitals_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (root / "capitals_gen.yaml").write_text(
        "task: capitals_gen\n" + common + "output_type: generate_until\n"
        "doc_to_target: \" {{capital}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 8\n"
        "  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
        "    ignore_punctuation: true\n")


def test_local_completions_loglikelihood_and_generation(smollm2_server, smollm2_dir, tmp_path,
                                                       monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path)
    s = smollm2_server
    args = (f"model={s.model_name},base_url={s.base_url}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={smollm2_dir},num_concurrent=1,"
            f"max_retries=1,tokenized_requests=True")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=["capitals_mc", "capitals_gen"], batch_size=4,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    scores = results["results"]
    assert scores["capitals_mc"]["sample_len"] == scores["capitals_gen"]["sample_len"] == 8
    # SmolLM2-135M-Instruct knows these: all 8 by likelihood, 7 of 8 generated.
    assert scores["capitals_mc"]["acc,none"] >= 0.75
    assert scores["capitals_gen"]["exact_match,none"] >= 0.75
    s.wait_idle()
