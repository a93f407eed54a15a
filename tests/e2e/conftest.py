"""End-to-end fixtures: the same real test guests as the integration tests."""

from tests.integration.conftest import debian_guest, short_dir, tiny_guest, vm_dirs

__all__ = ["debian_guest", "short_dir", "tiny_guest", "vm_dirs"]
