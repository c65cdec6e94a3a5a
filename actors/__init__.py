"""dlkeeper's actors, one module each, and the persisted state they share."""
