"""Health checking: pure endpoint state, active probes and passive ejection."""
