"""Helpers for the eval tests: a local OpenAI-compatible judge server that injects failures, and small inputs.

The fake judge reads markers that the test wrote into the answers, so one server serves every case:
    RATE=7            reply "Rating: [[7]]" (the last RATE= in the prompt: the turn being graded)
    RATES=2,9,x       the n-th request for this prompt gets the n-th entry (x: no rating), cycling
    FAIL=500          always HTTP 500           FAIL=500x2  HTTP 500 twice, then a normal reply
    FAIL=400 / 429x1  the same for other codes  FAIL=sleep  sleep `sleep_s` before replying (client timeout)
    FAIL=garbage      HTTP 200 with a non-JSON body   FAIL=empty  empty message content
    FAIL=norating     prose without a rating    FAIL=two    two different ratings
Pairwise prompts get [[A]]/[[B]]/[[C]] by comparing the RATE values of the two assistants.
A `script` (prompt, n-th request for it) → reply text replaces all of this: judges of known behaviour for the
audit (always_first, by_length, random_judge below).
Only mock of this project: the judge is a paid/networked API in real use.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

_RATE = re.compile(r"RATE=(\d+(?:\.\d+)?)")
_FAIL = re.compile(r"FAIL=([a-z0-9]+?)(?:x(\d+))?\b")
_RATES = re.compile(r"RATES=([0-9x.,]+)")


@dataclass
class Seen:
    """One request the fake judge received."""

    prompt: str
    status: int
    key: str
    body: dict
    auth: str


@dataclass
class FakeJudgeServer:
    """A ThreadingHTTPServer on a free loopback port speaking enough of the OpenAI API for the judge client."""

    model: str = "fake-judge"
    sleep_s: float = 1.5
    delay_s: float = 0.0
    script: Optional[Callable[[str, int], str]] = None
    requests: list[Seen] = field(default_factory=list)
    _counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def chat_requests(self) -> list[Seen]:
        with self._lock:
            return list(self.requests)

    def count(self, marker: str) -> int:
        """Requests whose prompt contains `marker`."""
        return sum(marker in r.prompt for r in self.chat_requests())

    def respond(self, body: dict[str, Any], auth: str = "") -> tuple[int, bytes, dict[str, str]]:
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        key = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        seen = Seen(prompt, 0, key, body, auth)
        with self._lock:  # recorded on arrival, so a request of a killed client is counted where it happened
            self._counts[key] += 1
            count = self._counts[key]
            self.requests.append(seen)
        status, payload, headers = self._decide(prompt, count, body)
        seen.status = status
        return status, payload, headers

    def _decide(self, prompt: str, count: int, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.script is not None:
            return 200, _completion(self.model, self.script(prompt, count)), {}
        fail = _FAIL.search(prompt)
        if fail:
            what, times = fail.group(1), int(fail.group(2) or 10**9)
            if count <= times:
                if what.isdigit():
                    headers = {"Retry-After": "0"} if what == "429" else {}
                    return int(what), json.dumps({"error": {"message": f"injected {what}"}}).encode(), headers
                if what == "sleep":
                    time.sleep(self.sleep_s)
                elif what == "garbage":
                    return 200, b"<html>this is not JSON", {"Content-Type": "application/json"}
                elif what == "empty":
                    return 200, _completion(self.model, ""), {}
                elif what == "norating":
                    return 200, _completion(self.model, "A decent answer, I would say seven out of ten."), {}
                elif what == "two":
                    return 200, _completion(self.model, "First [[3]], on reflection [[9]]."), {}
        rates = _RATES.search(prompt)
        if rates:
            pick = rates.group(1).split(",")[(count - 1) % len(rates.group(1).split(","))]
            text = "No score this time." if pick == "x" else f"Rating: [[{pick}]]"
            return 200, _completion(self.model, text), {}
        return 200, _completion(self.model, _verdict(prompt)), {}


def _verdict(prompt: str) -> str:
    rates = [float(r) for r in _RATE.findall(prompt)]
    if "[[A]]" in prompt:  # a pairwise prompt: A's answers come before B's
        a, b = (rates[0], rates[1]) if len(rates) == 2 else (rates[1], rates[3])
        return "Compared. " + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")
    rating = rates[-1] if rates else 5
    return f"The reply is adequate. Rating: [[{rating:g}]]"


def always_first(prompt: str, count: int) -> str:
    """Prefers whichever answer it is shown first; scores every single answer 5."""
    return "Compared. [[A]]" if "[[A]]" in prompt else "Rating: [[5]]"


def by_length(prompt: str, count: int) -> str:
    """Scores by the prompt's length: a longer answer scores higher, one point per 100 characters (single only)."""
    return f"Rating: [[{max(1, min(10, (len(prompt) - 600) // 100))}]]"


def random_judge(prompt: str, count: int) -> str:
    """A verdict or a score drawn from a hash of the prompt and the request's count: random, yet reproducible."""
    draw = int(hashlib.sha256(f"{count}:{prompt}".encode()).hexdigest(), 16)
    return f"[[{'ABC'[draw % 3]}]]" if "[[A]]" in prompt else f"Rating: [[{1 + draw % 10}]]"


def _completion(model: str, content: str) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def _handler(server: FakeJudgeServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": server.model, "object": "model", "owned_by": "test"}]}).encode(), {})
            else:
                self._send(404, b"{}", {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, b"{}", {})
                return
            status, payload, headers = server.respond(body, self.headers.get("Authorization", ""))
            self._send(status, payload, headers)

        def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

    return Handler


# ---- small inputs ---------------------------------------------------------------------------------------------

def port_open(port: int) -> bool:
    """Something accepts connections on this loopback port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_questions(n_per_category: int = 1, categories=("writing", "math", "coding", "stem")) -> list[dict]:
    """Two-turn questions; reference categories carry inline references."""
    out, qid = [], 1
    for cat in categories:
        for _ in range(n_per_category):
            rec = {"question_id": qid, "category": cat, "turns": [f"{cat} question {qid} turn one?",
                                                                 f"{cat} question {qid} turn two?"]}
            if cat in ("math", "coding", "reasoning"):
                rec["reference"] = [f"reference {qid} one", f"reference {qid} two"]
            out.append(rec)
            qid += 1
    return out


def make_answers(model_id: str, questions: list[dict], rate=lambda qid, turn: 5 + (qid + turn) % 4,
                 extra=lambda qid, turn: "") -> list[dict]:
    """Model answers whose text tells the fake judge which rating (RATE=) or failure (FAIL=) to produce."""
    return [{"question_id": q["question_id"], "answer_id": f"a{q['question_id']}", "model_id": model_id,
             "choices": [{"index": 0, "turns": [f"answer {q['question_id']}.{t} RATE={rate(q['question_id'], t)} "
                                                f"{extra(q['question_id'], t)}".strip() for t in (1, 2)]}],
             "tstamp": 0.0} for q in questions]


def make_run(root: Path, model_id: str = "tuned", questions: list[dict] | None = None, **answer_kw) -> Path:
    """A run-directory-shaped folder with questions.jsonl and answers/<model_id>.jsonl."""
    questions = questions if questions is not None else make_questions()
    write_jsonl(root / "questions.jsonl", questions)
    write_jsonl(root / "answers" / f"{model_id}.jsonl", make_answers(model_id, questions, **answer_kw))
    return root


# ---- a tiny real model ----------------------------------------------------------------------------------------

TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_CORPUS = ("the quick brown fox jumps over the lazy dog. rating score question answer reply one two three four "
           "five six seven eight nine ten [[1]] [[2]] [[3]] [[4]] [[5]] [[6]] [[7]] [[8]] [[9]] [[10]] "
           "[[A]] [[B]] [[C]] writing math coding reasoning stem humanities roleplay extraction turn")


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer LlamaForCausalLM with a small byte-level BPE tokenizer and a chat template,
    saved as a plain transformers checkpoint (vLLM and transformers both load it)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    specials = ["<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|end|>", pad_token="</s>")
    tok.chat_template = TINY_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, dtype=torch.float32)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
