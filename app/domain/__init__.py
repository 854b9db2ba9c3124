"""One package per area: models, schemas, services and thin controllers."""
