"""How a judgment is produced (`python -m eval.judge`): the judge spec, the judge prompts, the engine that turns
questions and answers into judge calls and stores them, the judges that answer those calls (an OpenAI-compatible
endpoint, a `vllm serve` started for the run, a model in this process), and reading a verdict out of a judge's
text."""
