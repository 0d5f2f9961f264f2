"""`pagedserve bench perplexity`: a model's perplexity on a text, computed the way llama.cpp's
`llama-perplexity` computes it, and with --reference, how far the model's predictions are from
another model's on the same tokens (a quantized file against its unquantized source): greedy
agreement over --greedy-tokens tokens and the mean |Δ logprob| of the reference's top 5.

Perplexity: the text is tokenized once (with BOS where the tokenizer adds one) and cut into
chunks of --ctx tokens (a shorter tail is dropped); where BOS is added, each chunk's first token
is replaced by it. Each chunk is one prompt, and its second half is scored: token j + 1 from the
logits at position j, for j from ctx / 2 to ctx - 2. PPL = exp(the mean negative
log-likelihood). `llama-perplexity -m FILE -f TEXT -c CTX -b CTX` gives the same quantity for a
GGUF file. The default text is server/assets/perplexity.txt."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from server.config_flags import add_engine_flags, engine_flag_kwargs

TOP = 5  # the reference's top tokens whose logprobs are compared
_LOOKUP = 20  # how many of the model's top tokens are searched for them (MAX_LOGPROBS)


@dataclass
class Scores:
    perplexity: float
    scored_tokens: int
    chunks: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench perplexity` flag (the CLI adds --log-level)."""
    parser.add_argument("--model", default=None,
                        help="model directory or GGUF file (default: the bundled stories260k)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="the text to score (default: the shipped perplexity.txt)")
    parser.add_argument("--ctx", type=int, default=128, help="tokens per chunk")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="score at most this many chunks")
    parser.add_argument("--reference", default=None, metavar="MODEL",
                        help="also score this model (same vocabulary) and compare: greedy "
                             "agreement and top-5 |Δ logprob|; it runs with the same engine "
                             "flags but --quantization none")
    parser.add_argument("--greedy-tokens", type=int, default=64,
                        help="tokens each greedy-agreement continuation runs")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary")
    add_engine_flags(parser.add_argument_group("engine"))


def make_chunks(token_ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """token_ids cut into whole chunks of ctx, each starting with bos where it is given."""
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4, not {ctx}")
    chunks = [list(token_ids[i:i + ctx]) for i in range(0, len(token_ids) - ctx + 1, ctx)]
    if not chunks:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one chunk of {ctx}")
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def tokenize(tokenizer, text: str) -> tuple[list[int], int | None]:
    """The text's ids as the model's tokenizer makes them, and the BOS id if it adds one."""
    ids = list(tokenizer(text, verbose=False).input_ids)  # verbose: no max-length warning
    plain = list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    return ids, (bos if adds_bos else None)


def prompt_logprobs(llm, chunks: list[list[int]], top: int) -> list[list[dict[int, float]]]:
    """Per chunk, per position p >= 1: token id -> logprob of the chunk's token p and of the
    model's top `top` there (position 0 has none)."""
    from server import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params)
    return [out.prompt_logprobs[1:] for out in outputs]


def scored_positions(ctx: int) -> range:
    """The chunk positions whose tokens are scored (llama-perplexity's second half)."""
    return range(ctx // 2 + 1, ctx)


def perplexity(chunks: list[list[int]], logprobs: list[list[dict[int, float]]]) -> Scores:
    nll, count = 0.0, 0
    for chunk, lps in zip(chunks, logprobs):
        for p in scored_positions(len(chunk)):
            nll -= lps[p - 1][chunk[p]]
            count += 1
    return Scores(math.exp(nll / count), count, len(chunks))


def top_logprob_delta(chunks: list[list[int]], reference: list[list[dict[int, float]]],
                      model: list[list[dict[int, float]]]) -> tuple[float, float]:
    """Mean |Δ logprob| over the reference's top-5 tokens at each scored position, and the share
    of those tokens found in the model's top 20 (the others are left out of the mean)."""
    total, found, wanted = 0.0, 0, 0
    for chunk, ref_lps, lps in zip(chunks, reference, model):
        for p in scored_positions(len(chunk)):
            ref_top = sorted(ref_lps[p - 1].items(), key=lambda kv: -kv[1])[:TOP]
            for token, logprob in ref_top:
                wanted += 1
                if token in lps[p - 1]:
                    total += abs(lps[p - 1][token] - logprob)
                    found += 1
    return (total / found if found else math.nan), found / wanted


def greedy_continuations(llm, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from server import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(out.outputs[0].token_ids) for out in outputs]


def agreement(reference: list[list[int]], model: list[list[int]]) -> tuple[float, float]:
    """(mean share of each continuation before the first differing token, share of
    continuations identical throughout)."""
    shares, same = [], 0
    for ref, out in zip(reference, model):
        common = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
        shares.append(common / len(ref))
        same += common == len(ref)
    return sum(shares) / len(shares), same / len(shares)


def _evaluate(llm, chunks: list[list[int]], top: int, greedy_prompts: list[list[int]],
              greedy_tokens: int) -> tuple[list, list, dict]:
    lps = prompt_logprobs(llm, chunks, top)
    greedy = greedy_continuations(llm, greedy_prompts, greedy_tokens) if greedy_prompts else []
    about = {"model": str(llm.engine.model_dir),
             "quantization": llm.engine.config.model.quantization}
    return lps, greedy, about


def main(args) -> int:
    from server import LLM
    from server.assets import PERPLEXITY_TEXT

    text_path = Path(args.text) if args.text else PERPLEXITY_TEXT
    engine = engine_flag_kwargs(args)
    llm = LLM(args.model, **engine)
    ids, bos = tokenize(llm.tokenizer, text_path.read_text())
    chunks = make_chunks(ids, args.ctx, bos)[:args.max_chunks]
    compare = args.reference is not None
    greedy_prompts = [c[:args.ctx // 4] for c in chunks] if compare else []
    vocab = len(llm.tokenizer)
    lps, greedy, about = _evaluate(llm, chunks, _LOOKUP if compare else 0, greedy_prompts,
                                   args.greedy_tokens)
    del llm
    summary: dict = {**about, "text": str(text_path), "text_tokens": len(ids), "ctx": args.ctx,
                     "bos": bos, **asdict(perplexity(chunks, lps)), "engine": engine}
    lines = [f"{about['model']} ({about['quantization']}): PPL {summary['perplexity']:.4f} over "
             f"{summary['scored_tokens']} tokens ({summary['chunks']} chunks of {args.ctx})"]
    if compare:
        ref_llm = LLM(args.reference, **{**engine, "quantization": "none"})
        if len(ref_llm.tokenizer) != vocab:
            raise ValueError(f"the reference's vocabulary has {len(ref_llm.tokenizer)} tokens, "
                             f"the model's {vocab}: their token ids cannot be compared")
        ref_lps, ref_greedy, ref_about = _evaluate(ref_llm, chunks, TOP, greedy_prompts,
                                                   args.greedy_tokens)
        del ref_llm
        ref = perplexity(chunks, ref_lps)
        delta, coverage = top_logprob_delta(chunks, ref_lps, lps)
        prefix, identical = agreement(ref_greedy, greedy)
        summary["reference"] = {**ref_about, **asdict(ref),
                                "perplexity_ratio": summary["perplexity"] / ref.perplexity,
                                "top5_mean_abs_delta_logprob": delta,
                                "top5_found": coverage,
                                "greedy_agreement": prefix, "greedy_identical": identical,
                                "greedy_tokens": args.greedy_tokens,
                                "greedy_prompts": len(greedy_prompts)}
        lines += [f"{ref_about['model']} ({ref_about['quantization']}): PPL "
                  f"{ref.perplexity:.4f} (ratio {summary['reference']['perplexity_ratio']:.4f})",
                  f"top-5 mean |Δ logprob| {delta:.4f} ({coverage:.1%} of the reference's top 5 "
                  f"in the model's top {_LOOKUP})",
                  f"greedy agreement over {args.greedy_tokens} tokens: {prefix:.1%} before the "
                  f"first difference, {identical:.0%} of {len(greedy_prompts)} identical"]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0
