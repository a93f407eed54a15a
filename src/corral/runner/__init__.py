"""The runner: one supervisor per VM, the same code in ``corral run``, the manager and a pod."""
