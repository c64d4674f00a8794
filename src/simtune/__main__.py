from simtune.cli import main

raise SystemExit(main())
