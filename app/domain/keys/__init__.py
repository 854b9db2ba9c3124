"""API keys: issued per tenant (scopes completions/billing) or for admins; shown once, stored hashed."""
