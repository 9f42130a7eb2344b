"""Key registry: machine, node and disco keys; pre-auth keys; expiry and revocation."""
