"""The local launcher: ``s2s up`` (one process group with a private Redis, the gateway
and one worker per stage).  Installed as ``s2s.launcher``."""
