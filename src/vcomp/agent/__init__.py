"""The volunteer agent: simulated TPM, sandbox and execution modes."""
