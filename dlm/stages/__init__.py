"""Stages: one plain function per factory stage, each over a typed config; a notebook can call them without Prefect."""
