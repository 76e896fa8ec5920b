"""The click commands behind ``qcache``; ``cli.py`` assembles them into one group."""
