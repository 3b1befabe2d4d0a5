"""The model: the bundle file (weights and metadata), the networks it declares, their CPU form, the shipped
bundles; builds on core."""
