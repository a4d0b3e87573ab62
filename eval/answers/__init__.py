"""How an answer is produced (`python -m eval.generate`): the generators (vLLM, transformers, one vLLM engine with
per-run LoRA), the chat template a conversation goes through, answering questions turn by turn into a resumable
answers file, and the many-runs-one-engine sweep."""
