from kvtriton.cli import main

raise SystemExit(main())
