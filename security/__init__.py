"""Security leaves of Plexus (floor 1): credentials, the key ring, ZAP. Imports nothing above."""
