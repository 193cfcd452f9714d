"""Framework-neutral serving decisions both adapters share: settings read once from the environment
and the serving arguments, and framework log lines that would misstate what the plugin does."""
