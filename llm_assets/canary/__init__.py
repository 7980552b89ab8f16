"""The canary release: a candidate served next to the current release for a fraction of the
traffic, compared on live figures, promoted or rolled back on the `canary.*` gates (docs/release.md)."""
