"""Ground-floor utilities every layer may use: collectives (``dist``), atomic file writes (``files``) and
terminal progress bars (``progress``). They import nothing else from wsss."""
