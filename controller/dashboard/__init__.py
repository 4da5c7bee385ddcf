"""The operator's web dashboard, served on the controller's HTTP port: server-rendered pages that
refresh their live part over Server-Sent Events, with no JavaScript build step."""
