-- Argo CD health of a sandcastle.dev AgentTask, read from the conditions the operator
-- writes (Succeeded once the task has finished, Reconciling while it has not, Stalled
-- when it failed) and status.observedGeneration. status.phase is for people and is not read.
-- Lua 5.1 with the base library only.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c)
  if c.message == nil or c.message == "" then
    return c.reason
  end
  return c.reason .. ": " .. c.message
end

-- The finalizer kills the task's sandbox before the object goes.
if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted"
  return hs
end

-- The spec cannot change after creation, so a status the operator has written always
-- describes the current spec: only a missing one means waiting.
if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to pick up the task"
  return hs
end

-- A failed task is Stalled: Degraded for good, like a failed Job, since the spec cannot
-- change and only a new task runs the agent again.
local stalled = condition("Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local succeeded = condition("Succeeded")
if is_true(succeeded) then
  hs.status = "Healthy"
  hs.message = describe(succeeded)
  return hs
end

-- Everything before the end is progress: waiting for the template or a Secret, queued
-- for a sandbox slot (it starts by itself, so it is not Suspended), provisioning,
-- running, or retrying after an infrastructure failure.
local reconciling = condition("Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

hs.status = "Progressing"
hs.message = "waiting for the Succeeded condition"
return hs
