"""dispy's node-side extensions: per-session setup/cleanup, files and
dependencies (``session``), and what a job sees inside its worker (``job``)."""
