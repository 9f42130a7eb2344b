"""Network lab: namespaces, veth links and NAT routers on one machine, for tests, demo and bench."""
