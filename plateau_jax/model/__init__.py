"""Everything about running a transformer: config, params, the functional core, sites,
interventions, loading. No plateau science lives here."""
