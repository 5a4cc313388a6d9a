"""Enriched contacts: the WhatsApp inbox's contacts with CRM data, cached in Redis."""
