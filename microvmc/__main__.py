from microvmc.cli import main

raise SystemExit(main())
