"""The ``corral`` command line. Heavy imports happen inside commands to keep start-up fast."""
