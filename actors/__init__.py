"""Actors: the actor core and every actor of a node."""
