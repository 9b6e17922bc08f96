"""Integrations with libraries that open Neo4j drivers of their own (LightRAG)."""
