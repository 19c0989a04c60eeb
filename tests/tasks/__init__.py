"""Tests of megaflow.tasks."""
