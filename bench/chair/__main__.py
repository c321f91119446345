from bench.chair.cli import main

raise SystemExit(main())
