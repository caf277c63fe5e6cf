"""Speed and quality benchmarks behind ``wsss bench``."""
