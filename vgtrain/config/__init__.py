"""Hydra configuration: where conf/ lives, the custom resolvers, the helpers that turn a composed
config into objects and data, and the schema every run is checked against before anything is built."""
