"""Ray: the embedded local cluster or an existing one, Ray Train launch, and Ray Jobs submission."""
