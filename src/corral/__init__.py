"""corral: run and manage QEMU virtual machines without libvirt.

The layers (who may import whom) are drawn in the README's architecture section and
enforced by import-linter contracts in ``pyproject.toml``.
"""

__version__ = "0.1.0"
