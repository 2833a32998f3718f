"""Operations: the benchmark (``ops.bench``), dashboards and deployment files."""
