"""A judge model run in-process (`--judge local:PATH`): vLLM, or transformers when vLLM is missing.

With a constrained judge (the default for local judges) the output is forced to a bare rating `[[1]]`…`[[10]]`
(or `[[A]]`/`[[B]]`/`[[C]]`): vLLM through a structured-output regex; transformers through `generate` with a
prefix-constrained logits processor that allows only the tokens keeping the text a prefix of an allowed string
(greedy at temperature 0, sampled among the allowed tokens above it). A small judge that rambles never reaches its
rating otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eval.answers.chat_template import load_tokenizer, tokenize_chat
from eval.answers.generators import GenRequest, Generator, HFGenerator, fit_new_tokens, make_generator
from eval.common import EvalError
from eval.judging.calls import CallRequest, CallResult
from eval.judging.verdicts import RATING_CHOICES, RATING_REGEX, VERDICT_CHOICES, VERDICT_REGEX


class LocalBackend:
    """Judge calls answered by a model loaded in this process, in chunks (each chunk saved before the next)."""

    def __init__(self, model_dir: Path, backend: str, dtype: str, constrained: bool, seed: int,
                 chunk: int = 16, max_model_len: int | None = None, generator: Generator | None = None) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        # an already loaded engine (a test comparing engines) or a new one
        self.generator = generator or make_generator(backend, model_dir, dtype, max_model_len, seed)  # type: ignore
        self.constrained = constrained
        self.chunk = chunk

    def close(self) -> None:
        self.generator.close()

    def run(self, requests: list[CallRequest], done: Callable[[int, CallResult], None]) -> None:
        for start in range(0, len(requests), self.chunk):
            indices = range(start, min(start + self.chunk, len(requests)))
            for i, result in zip(indices, self._batch([requests[i] for i in indices])):
                done(i, result)

    def _batch(self, requests: list[CallRequest]) -> list[CallResult]:
        results: list[CallResult | None] = [None] * len(requests)
        todo: list[tuple[int, GenRequest]] = []
        for i, r in enumerate(requests):
            ids = tokenize_chat(self.tokenizer, r.messages)
            try:
                new = fit_new_tokens(len(ids), r.max_tokens, self.generator.max_model_len, "judge prompt")
            except EvalError as e:
                results[i] = CallResult(None, "prompt_too_long", str(e))
                continue
            if self.constrained and isinstance(self.generator, HFGenerator):
                results[i] = CallResult(self._choose(ids, r))
                continue
            regex = (RATING_REGEX if r.output == "rating" else VERDICT_REGEX) if self.constrained else None
            todo.append((i, GenRequest(ids, r.temperature, new, r.seed, regex)))
        if todo:
            outputs = self.generator.generate([g for _, g in todo])
            for (i, _), out in zip(todo, outputs):
                results[i] = (CallResult(out.text) if out.text.strip()
                              else CallResult(None, "empty_response", "the judge generated no text"))
        return results  # type: ignore[return-value]

    def _choose(self, ids: list[int], r: CallRequest) -> str:
        """transformers' `generate` with a prefix-constrained logits processor: at each step only the tokens that
        keep the text a prefix of an allowed string stay possible, then end-of-sequence once one is complete."""
        import torch
        from transformers import GenerationConfig

        choices = RATING_CHOICES if r.output == "rating" else VERDICT_CHOICES
        spelled = {c: self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices}
        eos = self.generator.eos[0] if isinstance(self.generator.eos, list) else self.generator.eos
        if eos is None:
            raise EvalError("the judge model has no eos_token_id in its generation config; constrained judging "
                            "ends each rating with it")

        def allowed(batch: int, sequence) -> list[int]:
            prefix = sequence[len(ids):].tolist()
            if prefix in spelled.values():  # every allowed string ends in "]]": none is a prefix of another
                return [eos]
            return sorted({t[len(prefix)] for t in spelled.values()
                           if len(t) > len(prefix) and t[:len(prefix)] == prefix})

        sample = r.temperature > 0
        config = GenerationConfig(max_new_tokens=max(map(len, spelled.values())) + 1, do_sample=sample,
                                  temperature=r.temperature if sample else None, top_k=0 if sample else None,
                                  top_p=1.0, repetition_penalty=1.0, eos_token_id=eos,
                                  pad_token_id=self.generator.pad)
        torch.manual_seed(r.seed)
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = self.generator.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                generation_config=config, prefix_allowed_tokens_fn=allowed)
        tokens = out[0, len(ids):].tolist()
        tokens = tokens[:-1] if tokens and tokens[-1] == eos else tokens
        return next(c for c, t in spelled.items() if t == tokens)
