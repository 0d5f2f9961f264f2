"""The offline front door: `LLM(model=None, **engine_args).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from server.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.fan_out import fan_out
from server.engine.tokenizer import load_tokenizer
from server.outputs import CompletionOutput, RequestOutput
from server.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = load_tokenizer(self.engine.model_dir)
        self._ids = itertools.count()

    def _normalize_prompts(self, prompts) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            return self._tokenize(str(prompt["prompt"]))
        return None, [int(t) for t in prompt]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        items = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(items)
                       if isinstance(sampling_params, SamplingParams) else list(sampling_params))
        if len(params_list) != len(items):
            raise ValueError(f"got {len(params_list)} sampling params for {len(items)} prompts")
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        # engine request id -> (its request's id, completion index, params)
        children: dict[str, tuple[str, int, SamplingParams]] = {}
        try:
            for item, params in zip(items, params_list):
                text, token_ids = self._tokenize(item)
                request_id = str(next(self._ids))
                order.append(request_id)
                results[request_id] = RequestOutput(
                    request_id, text, token_ids,
                    [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None
                                      else None) for i in range(params.n)])
                for index, (child_id, child_params) in enumerate(fan_out(request_id, params)):
                    self.engine.add_request(child_id, token_ids, child_params)
                    children[child_id] = (request_id, index, child_params)
            self._run(results, children, use_tqdm)
        except BaseException:
            for child_id in children:
                self.engine.abort_request(child_id)
            raise
        return [results[r] for r in order]

    def _run(self, results: dict[str, RequestOutput],
             children: dict[str, tuple[str, int, SamplingParams]], use_tqdm: bool) -> None:
        bar = tqdm(total=len(results), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            for _, message in self.engine.take_failed():
                raise ValueError(message)
            for out in outputs:
                request_id, index, params = children[out.request_id]
                result = results[request_id]
                completion = result.outputs[index]
                completion.token_ids.extend(out.new_token_ids)
                result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
                if out.prompt_logprobs is not None:
                    scored: list[dict[int, float] | None] = [None]
                    for s in out.prompt_logprobs:
                        assert s.logprob is not None
                        scored.append({**(s.top_logprobs or {}), s.token_id: s.logprob})
                    result.prompt_logprobs = scored
                for sample in out.new_logprobs:
                    assert completion.logprobs is not None and sample.logprob is not None
                    entry = dict(sample.top_logprobs or {})
                    entry[sample.token_id] = sample.logprob
                    completion.logprobs.append(entry)
                    completion.cumulative_logprob = ((completion.cumulative_logprob or 0.0)
                                                     + sample.logprob)
                if out.finished:
                    completion.finish_reason = out.finish_reason
                    completion.stop_reason = out.stop_reason
                    completion.text = self.tokenizer.decode(
                        completion.token_ids,
                        skip_special_tokens=params.skip_special_tokens)
                    if result.finished:
                        bar.update(1)
        bar.close()
