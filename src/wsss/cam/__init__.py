"""CAMs, pseudo labels and their refinement."""
