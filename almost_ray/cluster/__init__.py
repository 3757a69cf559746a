"""Everything that talks to Ray: connecting (`connect`), pool and replica settings (`config`), Ray Data actor
pools (`pools`), the one replica class and long-lived replica sets (`replicas`), whether a pool fits the
cluster (`preflight`), peak memory per actor (`memory`) and the dashboard's metrics (`dashboard`)."""
