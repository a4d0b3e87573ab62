"""The judge audit (python -m eval.audit): agreement statistics, the probes' judge items, reference labels, the
figures written to audit.json, and the report's audit section."""
