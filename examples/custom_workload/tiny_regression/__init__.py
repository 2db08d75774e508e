"""A user workload that is not installed anywhere: `koala submit job.yaml --workload-dir tiny_regression` ships it."""
