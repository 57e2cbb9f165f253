"""Prompt templates, shipped as package data (``pipeline.resources.prompts``); see README.md."""
