"""The Ray corpus job: the only package in flowray that imports ray (lazily, inside functions)."""
