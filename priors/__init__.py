"""twin.priors (grows with the dynamics issue)."""
__all__: list[str] = []
