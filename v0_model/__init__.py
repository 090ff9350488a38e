"""V0, the generalist value model: frozen backbone, residual query adapter, in-context head."""
