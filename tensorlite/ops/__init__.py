"""Op families, one file each: every op's forward and backward side by side."""
