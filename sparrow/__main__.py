from sparrow.cli import main

if __name__ == "__main__":  # not when a worker process is spawned (it imports this module)
    raise SystemExit(main())
