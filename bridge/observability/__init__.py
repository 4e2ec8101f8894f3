"""Operations building blocks: structured logging with secret redaction, Prometheus metrics."""
