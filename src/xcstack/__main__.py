from xcstack.cli import main

raise SystemExit(main())
