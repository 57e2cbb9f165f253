"""JSON Schemas of the record contract, shipped as package data (``pipeline.resources.schemas``)."""
