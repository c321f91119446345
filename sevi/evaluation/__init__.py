"""What evaluation shares with the runtime: the COCO object vocabulary (the playground, bench and the tests
read it)."""
